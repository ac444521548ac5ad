//! The agent's replicas of the catalog documents ([`shelfsync_node::catalog`]): the hub's
//! catalog (read-only here) and this store's overrides, with the sync state towards the hub.

use rusqlite::params;
use shelfsync_node::catalog::{
    generate, item_rows, load_sync_state, override_rows, receive, write_chunk, write_item_rows, write_override_rows,
    write_overrides, CatalogError, Overrides, TrackedDoc, CATALOG_DOC,
};
use shelfsync_shared::{Sku, StoreId};

/// The agent's replicas: the hub's catalog (read-only here) and this store's overrides, with the
/// sync state towards the hub. Serves the catalog offline from the materialised tables.
pub struct AgentCatalog {
    store: StoreId,
    docs: tokio::sync::Mutex<AgentDocs>,
}

struct AgentDocs {
    catalog: TrackedDoc,
    overrides: TrackedDoc,
    catalog_state: automerge::sync::State,
    overrides_state: automerge::sync::State,
}

/// The agent's name for its peer in `doc_sync`.
const HUB_PEER: &str = "hub";
/// The agent's local name of its overrides document.
pub const LOCAL_OVERRIDES_DOC: &str = "overrides";

impl AgentCatalog {
    /// Loads both documents.
    pub async fn load(db: &crate::db::Db) -> Result<std::sync::Arc<AgentCatalog>, CatalogError> {
        let store = db.identity().store.clone();
        let docs = db
            .read(|conn| -> Result<AgentDocs, CatalogError> {
                Ok(AgentDocs {
                    catalog: TrackedDoc::load(conn, CATALOG_DOC)?,
                    overrides: TrackedDoc::load(conn, LOCAL_OVERRIDES_DOC)?,
                    catalog_state: load_sync_state(conn, CATALOG_DOC, HUB_PEER)?,
                    overrides_state: load_sync_state(conn, LOCAL_OVERRIDES_DOC, HUB_PEER)?,
                })
            })
            .await?;
        Ok(std::sync::Arc::new(AgentCatalog { store, docs: tokio::sync::Mutex::new(docs) }))
    }

    /// Sets (or clears) this store's overrides of one SKU, durably.
    pub async fn set_overrides(&self, db: &crate::db::Db, sku: &Sku, o: Overrides) -> Result<(), CatalogError> {
        let mut docs = self.docs.lock().await;
        write_overrides(&mut docs.overrides.doc, sku.as_str(), &o)?;
        let write = docs.overrides.take_write();
        let rows = override_rows(&docs.overrides.doc, &[sku.to_string()].into());
        let store = self.store.clone();
        db.write(move |conn| -> Result<(), CatalogError> {
            if let Some(w) = &write {
                write_chunk(conn, w)?;
            }
            write_override_rows(conn, &store, &rows)
        })
        .await
    }

    /// A new connection: the persisted states, and a first message for each document.
    pub async fn connected(
        &self,
        db: &crate::db::Db,
    ) -> Result<Vec<(shelfsync_shared::wire::CatalogDoc, Vec<u8>)>, CatalogError> {
        use shelfsync_shared::wire::CatalogDoc;
        let (cs, os) = db
            .read(|conn| -> Result<_, CatalogError> {
                Ok((
                    load_sync_state(conn, CATALOG_DOC, HUB_PEER)?,
                    load_sync_state(conn, LOCAL_OVERRIDES_DOC, HUB_PEER)?,
                ))
            })
            .await?;
        let mut docs = self.docs.lock().await;
        let d = &mut *docs;
        d.catalog_state = cs;
        d.overrides_state = os;
        let mut out = Vec::new();
        if let Some(m) = generate(&mut d.catalog.doc, &mut d.catalog_state) {
            out.push((CatalogDoc::Catalog, m));
        }
        if let Some(m) = generate(&mut d.overrides.doc, &mut d.overrides_state) {
            out.push((CatalogDoc::Overrides, m));
        }
        Ok(out)
    }

    /// The overrides changed here: what to tell the hub.
    pub async fn local_change(&self) -> Option<Vec<u8>> {
        let mut docs = self.docs.lock().await;
        let d = &mut *docs;
        generate(&mut d.overrides.doc, &mut d.overrides_state)
    }

    /// A sync message from the hub: apply it durably (document, materialised rows, sync state
    /// in one transaction) and return the reply, if any.
    pub async fn message(
        &self,
        db: &crate::db::Db,
        doc: shelfsync_shared::wire::CatalogDoc,
        bytes: &[u8],
    ) -> Result<Option<Vec<u8>>, CatalogError> {
        use shelfsync_shared::wire::CatalogDoc;
        let mut docs = self.docs.lock().await;
        let d = &mut *docs;
        let (tracked, state, depth, name) = match doc {
            CatalogDoc::Catalog => (&mut d.catalog, &mut d.catalog_state, 1, CATALOG_DOC),
            CatalogDoc::Overrides => (&mut d.overrides, &mut d.overrides_state, 0, LOCAL_OVERRIDES_DOC),
        };
        // The hub may update the catalog; it never edits a store's overrides.
        let changed = receive(&mut tracked.doc, state, bytes, depth, doc == CatalogDoc::Catalog)?;
        let write = tracked.take_write();
        let items = if doc == CatalogDoc::Catalog { item_rows(&tracked.doc, &changed) } else { Vec::new() };
        let reply = generate(&mut tracked.doc, state);
        let encoded = state.encode();
        let current = db.current();
        // A message from the hub means a live session: when catalog entries changed, or the hub
        // acknowledged this store's own overrides, the escrow rules in force may have, so grant
        // what they ask now (as after a restock). Sync chatter with no change costs no scan.
        let regrant = !items.is_empty() || doc == CatalogDoc::Overrides;
        db.write(move |conn| -> Result<(), CatalogError> {
            if let Some(w) = &write {
                write_chunk(conn, w)?;
            }
            write_item_rows(conn, &items)?;
            if regrant {
                crate::rights::grant_due(conn, &current.get())?;
            }
            conn.prepare_cached(
                "INSERT INTO doc_sync (doc, peer, state) VALUES (?1, ?2, ?3)
                 ON CONFLICT (doc, peer) DO UPDATE SET state = excluded.state",
            )?
            .execute(params![name, HUB_PEER, encoded])?;
            Ok(())
        })
        .await?;
        Ok(reply)
    }
}
