//! The lifecycle of backup data around the engine: which repository a rule's
//! points live in (and when one may be created), retention, forget, garbage
//! collection and deleting a rule's data (R9, R15-R21).
//!
//! - `repository.rs`: a rule's repository from the state store: the target's
//!   marker, and "a missing repository is an error, never a new one".
//! - `retention.rs`: the pure plan: points + retention + now → keep/remove.
//! - `prune.rs`: applying it (`prune`), removing chosen points (`forget`).
//! - `gc.rs`: garbage collection of the rules' repositories (`repo::gc` marks
//!   and sweeps), deferred when busy, once a day when automatic.
//! - `delete.rs`: removing a rule, with its data when asked (R9, R37).

pub mod delete;
pub mod gc;
pub mod prune;
pub mod repository;
pub mod retention;

pub use repository::{
    copy_repository, open_target, repository_for_backup, restore_repository, rule_repository,
    rule_repository_with_points,
};
