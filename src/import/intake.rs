//! What one import writes into the store, and the order in which it is named.
//!
//! Large new objects are staged as loose files under `tmp/`; small new ones go to a spool
//! ([`Spool`]) and from there, at the end, into one pack in the order an image of the
//! imported trees reads them. [`Intake::finish`] names everything in the order that keeps
//! every name valid after a crash: the loose objects, then the pack, then the trees that
//! name them. The order is found by laying out the trees before they are stored.

use crate::image::{self, CreateOptions, EncodedTree};
use crate::store::pack::PackIndex;
use crate::store::{ObjectId, Spool, Staged, Store, StoreError};
use crate::tree::binary::TreeView;
use crate::tree::Manifest;

/// Whether an import packs its new small objects, and in which order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Packing {
    /// In the order an image of each tree alone reads them, tree after tree.
    #[default]
    EachTree,
    /// In the order the image `name` of the stored trees `below` and then all the new
    /// trees merged reads them (`import deb --name`, `overlay commit`); tree after tree if
    /// they do not merge.
    AsImage { name: String, below: Vec<ObjectId> },
    /// Not at all: every object stays a loose file (`--no-pack`; `store pack` packs later).
    Loose,
}

/// The new objects of one import until they are named.
pub(crate) struct Intake<'s> {
    store: &'s Store,
    packing: Packing,
    spool: Option<Spool>,
    /// Large objects, or all of them when not packing.
    pub staged: Vec<Staged>,
}

/// What [`Intake::finish`] named.
pub(crate) struct Finished {
    /// The ids of the trees, in the order given.
    pub trees: Vec<ObjectId>,
    pub pack: Option<PackIndex>,
}

impl<'s> Intake<'s> {
    pub fn new(store: &'s Store, packing: Packing) -> Result<Intake<'s>, StoreError> {
        let spool = match packing {
            Packing::Loose => None,
            _ => Some(Spool::new(store)?),
        };
        Ok(Intake {
            store,
            packing,
            spool,
            staged: Vec::new(),
        })
    }

    /// Where new small objects go instead of staged loose files ([`Spool::takes`]), unless
    /// the import leaves them loose.
    pub fn spool(&self) -> Option<&Spool> {
        self.spool.as_ref()
    }

    /// Names the new objects and then the trees of `manifests` (each validated), and
    /// returns the trees' ids.
    pub fn finish(self, manifests: &[&Manifest]) -> Result<Finished, StoreError> {
        self.finish_ordered_by(manifests, manifests.len())
    }

    /// [`Intake::finish`], packing in the order of the first `ordering` trees only (the
    /// objects only the others name follow in the order they were read): an OCI image's
    /// lower layers hold little its top layer does not, and laying each out would cost
    /// about as much as the top.
    pub fn finish_ordered_by(
        mut self,
        manifests: &[&Manifest],
        ordering: usize,
    ) -> Result<Finished, StoreError> {
        let encoded: Vec<EncodedTree> = manifests.iter().map(|m| EncodedTree::new(m)).collect();
        self.store.commit(std::mem::take(&mut self.staged))?;
        let pack = match &self.spool {
            Some(spool) if !spool.is_empty() => {
                let order = self.order(&encoded[..ordering.min(encoded.len())]);
                self.store.write_spooled_pack(spool, &order)?
            }
            _ => None,
        };
        let trees = encoded
            .iter()
            .map(|t| image::put_encoded(self.store, t))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Finished { trees, pack })
    }

    /// The order to pack the spooled objects in. A tree that cannot be laid out (the
    /// import of a tree too large for ext4 still succeeds) leaves its objects to the end,
    /// in the order they were read.
    fn order(&self, trees: &[EncodedTree]) -> Vec<ObjectId> {
        let Some(views) = trees.iter().map(|t| t.view()).collect::<Option<Vec<_>>>() else {
            return Vec::new();
        };
        let opts = CreateOptions::default();
        let order_of = |name: &str, ids: &[ObjectId], views: &[TreeView]| {
            image::read_order_of(&image::record(name, ids, &opts), views)
                .inspect_err(|e| tracing::debug!(error = %e, "no image order to pack in"))
                .unwrap_or_default()
        };
        if let Packing::AsImage { name, below } = &self.packing {
            let below = below
                .iter()
                .map(|id| image::load_tree_view(self.store, id))
                .collect::<Result<Vec<_>, _>>();
            match below {
                Ok(mut layers) => {
                    let mut ids: Vec<ObjectId> = layers.iter().map(|v| *v.tree()).collect();
                    ids.extend(trees.iter().map(|t| t.id));
                    layers.extend(views.iter().cloned());
                    let order = order_of(name, &ids, &layers);
                    if !order.is_empty() {
                        return order;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "no image order to pack in"),
            }
        }
        trees
            .iter()
            .zip(views)
            .flat_map(|(tree, view)| order_of("tree", &[tree.id], &[view]))
            .collect()
    }
}
