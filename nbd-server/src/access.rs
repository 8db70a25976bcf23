//! Who may use which export: allow-rules over export names, matched against the identities
//! in a client's TLS certificate.
//!
//! A rule is `PATTERN=ID[,ID...]` (`--allow`, repeatable): clients holding any of the IDs may
//! use exports whose name matches PATTERN (a glob: `tenant-a-*`). An identity is a DNS name
//! or a URI in the certificate's subject alternative names (`host-a1.tenant-a.example`,
//! `spiffe://tenant-a/host-a1`); the certificate chain was already checked against the
//! client CA during the handshake, so these names are the CA's word. The two kinds never
//! match each other: an ID with a `:` is a URI and matches URI names only (exactly); any
//! other ID is a DNS name and matches DNS names only (regardless of case). So a URI entry
//! `ops` in a certificate (a CA that constrains DNS names may not constrain URIs) is not the
//! DNS name `ops`, and URI entries without a scheme are ignored. `*` as an ID admits any
//! certified client. A rule whose pattern is `*` also makes its IDs administrators of the
//! control API (store-wide methods, migrations).
//!
//! No rule at all keeps the server open (every client may use every export, as without
//! TLS). With rules, everything not allowed is refused: a client that is not allowed an
//! export neither sees it in NBD_OPT_LIST nor can open it, and gets the same answer as for a
//! name that does not exist.

use rustls::pki_types::CertificateDer;

/// A client as the access rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    /// Over a local Unix socket guarded by its file mode (the control socket): trusted.
    Local,
    /// No certificate (yet): before STARTTLS, or TLS without a client certificate.
    Anonymous,
    /// The identities of a verified client certificate.
    Certified(Vec<Identity>),
}

/// One name of a certificate (or of a rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A DNS name, lowercased.
    Dns(String),
    /// A URI, with its scheme.
    Uri(String),
}

impl Identity {
    /// An ID of a rule: a URI if it has a `:`, else a DNS name.
    pub fn parse(id: &str) -> Identity {
        if id.contains(':') {
            Identity::Uri(id.to_owned())
        } else {
            Identity::Dns(id.to_ascii_lowercase())
        }
    }

    fn describe(&self) -> &str {
        match self {
            Identity::Dns(s) | Identity::Uri(s) => s,
        }
    }
}

impl Client {
    /// The client of a verified certificate chain (the end-entity certificate first).
    pub fn from_chain(chain: Option<&[CertificateDer<'_>]>) -> Client {
        match chain.and_then(|c| c.first()) {
            Some(cert) => Client::Certified(identities(cert)),
            None => Client::Anonymous,
        }
    }

    /// For logs: the identities, or what the client is.
    pub fn describe(&self) -> String {
        match self {
            Client::Local => "local".into(),
            Client::Anonymous => "anonymous".into(),
            Client::Certified(ids) if ids.is_empty() => "certified, no name".into(),
            Client::Certified(ids) => ids.iter().map(Identity::describe).collect::<Vec<_>>().join(","),
        }
    }
}

/// The DNS and URI names of a certificate's subject alternative names (URIs without a
/// scheme left out).
pub fn identities(cert: &CertificateDer<'_>) -> Vec<Identity> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee
            .valid_dns_names()
            .map(|d| Identity::Dns(d.to_ascii_lowercase()))
            .chain(ee.valid_uri_names().filter(|u| u.contains(':')).map(|u| Identity::Uri(u.to_owned())))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Problems in an `--allow` rule.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0:?}: expected PATTERN=ID[,ID...]")]
    Syntax(String),
    #[error("{rule:?}: bad pattern: {source}")]
    Pattern { rule: String, source: glob::PatternError },
}

#[derive(Debug, Clone)]
struct Rule {
    pattern: glob::Pattern,
    /// None: any certified client (`*`).
    identities: Vec<Option<Identity>>,
}

/// The allow-rules of one server.
#[derive(Debug, Clone, Default)]
pub struct AccessRules {
    rules: Vec<Rule>,
}

impl AccessRules {
    /// Parses `PATTERN=ID[,ID...]` rules.
    pub fn parse<'a>(specs: impl IntoIterator<Item = &'a str>) -> Result<AccessRules, AccessError> {
        let mut rules = Vec::new();
        for spec in specs {
            let (pattern, ids) = spec.split_once('=').ok_or_else(|| AccessError::Syntax(spec.to_owned()))?;
            let identities: Vec<Option<Identity>> = ids
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|id| (id != "*").then(|| Identity::parse(id)))
                .collect();
            if pattern.trim().is_empty() || identities.is_empty() {
                return Err(AccessError::Syntax(spec.to_owned()));
            }
            let pattern = glob::Pattern::new(pattern.trim())
                .map_err(|source| AccessError::Pattern { rule: spec.to_owned(), source })?;
            rules.push(Rule { pattern, identities });
        }
        Ok(AccessRules { rules })
    }

    /// No rules: every client may use everything.
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    fn holds(rule: &Rule, client: &Client) -> bool {
        match client {
            Client::Certified(ids) => rule.identities.iter().any(|allowed| match allowed {
                None => true,
                Some(allowed) => ids.contains(allowed),
            }),
            Client::Local | Client::Anonymous => false,
        }
    }

    /// Whether `client` may see and open the export (or control the disk) `name`.
    pub fn may_use(&self, client: &Client, name: &str) -> bool {
        self.is_open()
            || *client == Client::Local
            || self.rules.iter().any(|r| r.pattern.matches(name) && Self::holds(r, client))
    }

    /// Whether `client` may call store-wide and migration methods of the control API.
    pub fn is_admin(&self, client: &Client) -> bool {
        self.is_open()
            || *client == Client::Local
            || self.rules.iter().any(|r| r.pattern.as_str() == "*" && Self::holds(r, client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certified(ids: &[&str]) -> Client {
        Client::Certified(ids.iter().map(|s| Identity::parse(s)).collect())
    }

    #[test]
    fn rules_allow_by_pattern_and_identity() {
        let rules =
            AccessRules::parse(["tenant-a-*=host-a1,host-a2", "tenant-b-*=host-b", "shared=*", "*=ops"]).unwrap();
        let a = certified(&["host-a1"]);
        assert!(rules.may_use(&a, "tenant-a-vm"));
        assert!(!rules.may_use(&a, "tenant-b-vm"));
        assert!(rules.may_use(&a, "shared"), "* admits any certified client");
        assert!(!rules.may_use(&Client::Anonymous, "shared"));
        assert!(!rules.may_use(&a, "tenant-a"), "the pattern is matched whole");
        assert!(!rules.is_admin(&a));
        let ops = certified(&["ops"]);
        assert!(rules.may_use(&ops, "tenant-b-vm") && rules.is_admin(&ops));
        assert!(rules.may_use(&Client::Local, "anything") && rules.is_admin(&Client::Local));
        assert!(!rules.may_use(&certified(&[]), "tenant-a-vm"));
        assert!(rules.may_use(&certified(&["HOST-A1"]), "tenant-a-vm"), "DNS names regardless of case");
    }

    #[test]
    fn dns_and_uri_names_never_stand_for_each_other() {
        let rules = AccessRules::parse(["a-*=host-a", "b-*=spiffe://tenant-b/host", "*=ops"]).unwrap();
        // A URI entry spelled like a DNS name is not that name.
        let sneaky = Client::Certified(vec![Identity::Uri("ops".into()), Identity::Uri("host-a".into())]);
        assert!(!rules.is_admin(&sneaky) && !rules.may_use(&sneaky, "a-vm"));
        assert!(!rules.may_use(&certified(&["spiffe"]), "b-vm"));
        assert!(rules.may_use(&certified(&["spiffe://tenant-b/host"]), "b-vm"));
        assert!(!rules.may_use(&certified(&["spiffe://tenant-b/HOST"]), "b-vm"), "URIs exactly");
    }

    #[test]
    fn no_rules_is_open_and_bad_rules_are_refused() {
        let open = AccessRules::default();
        assert!(open.may_use(&Client::Anonymous, "x") && open.is_admin(&Client::Anonymous));
        assert!(AccessRules::parse(["tenant-a-*"]).is_err());
        assert!(AccessRules::parse(["=host"]).is_err());
        assert!(AccessRules::parse(["vm=, ,"]).is_err());
        assert!(AccessRules::parse(["vm[=host"]).is_err());
    }
}
