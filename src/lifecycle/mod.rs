//! The lifecycle of backup data around the engine: which repository a rule's
//! points live in (and when one may be created), retention, forget, garbage
//! collection and deleting a rule's data (R9, R15-R21).
//!
//! - `repository.rs`: a rule's repository from the state store: the target's
//!   marker, and "a missing repository is an error, never a new one".

pub mod repository;

pub use repository::{
    open_target, repository_for_backup, rule_repository, rule_repository_with_points,
};
