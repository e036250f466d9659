//! Keeping a store in order: `gc`, `pack`, `stats` and `verify`, which must know what images and
//! trees are (an image names trees, a tree names objects) to tell what is live. The store
//! below them knows only files by name; these walk image records → trees → objects, and so
//! sit above both `store` and `image` in the flow.

mod gc;
pub mod pack;
mod repair;
mod stats;
mod verify;

pub use gc::{gc, GcReport};
pub use pack::{pack, PackReport};
pub use repair::{repair, RepairReport};
pub use stats::{stats, StoreStats};
pub use verify::{verify, Problem, VerifyReport};
