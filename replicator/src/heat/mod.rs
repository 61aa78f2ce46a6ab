//! Heat and policy: which files processes read from the wrong node
//! ([`scan`]), which of them a policy lets replicad copy ([`policy`]), and
//! what to do about it ([`plan`]). The daemon steps the scanner under its
//! CPU budget, plans, and carries out the plan for policies in
//! `replicate` mode.

pub mod driver;
pub mod glob;
pub mod plan;
pub mod policy;
pub mod scan;

#[cfg(test)]
mod tests;

pub use driver::{Planner, Pressure, TickReport};
pub use plan::{plan, Action, Existing, Machine, Plan, Planned};
pub use policy::{Budget, Kind, Mode, Policies, Policy, ScanConfig};
pub use scan::{PassStats, ProcHeat, Scanner, SourceHeat};
