//! Library side of the operator tools: everything the `cas` and `migrate` binaries do, so
//! that their `main`s stay thin and the logic is testable.

pub mod control;
pub mod image;
pub mod similarity;
pub mod size;
pub mod table;
