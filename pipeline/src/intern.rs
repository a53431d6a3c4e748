//! Names that many records repeat, stored once per node and named by a `u32`.
//!
//! A device id ("phone", "web") is shared by most users; each session and ack cursor
//! names its device by a [`DeviceId`] instead of carrying the string (DESIGN.md §6).
//! Names are never forgotten: there are few distinct device ids, and each one is
//! remembered by a durable ack cursor anyway.

use std::collections::HashMap;
use std::sync::Arc;

/// An interned device id.
pub type DeviceId = u32;

/// A table of interned names. See the [module](self) docs.
#[derive(Debug, Default)]
pub struct Interner {
    ids: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

impl Interner {
    /// The id of `name`, interning it if it is new.
    ///
    /// # Panics
    /// If more than `u32::MAX` names were interned.
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = u32::try_from(self.names.len()).expect("fewer than 2^32 interned names");
        let name: Arc<str> = Arc::from(name);
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }

    /// The id of `name`, if it was interned.
    pub fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// The name of `id`, shared: messages keep it as their `from_device`.
    ///
    /// # Panics
    /// If `id` was not given by [`intern`](Self::intern) on this table.
    pub fn name(&self, id: u32) -> &Arc<str> {
        &self.names[id as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_interned_once() {
        let mut t = Interner::default();
        let phone = t.intern("phone");
        let web = t.intern("web");
        assert_ne!(phone, web);
        assert_eq!(t.intern("phone"), phone);
        assert_eq!(t.get("web"), Some(web));
        assert_eq!(t.get("tv"), None);
        assert_eq!((&**t.name(phone), &**t.name(web)), ("phone", "web"));
    }
}
