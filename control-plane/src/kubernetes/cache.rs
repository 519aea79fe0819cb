//! The objects of one kind as the watcher last listed and followed them.
//!
//! A watcher (re)list arrives as `Init`, `InitApply`s, `InitDone`. The objects listed are
//! buffered and replace the cache only at `InitDone`, so the cache is never a half-read
//! list: a sync that compared a half-read list with the store would delete what it
//! had not read yet.

use std::collections::BTreeMap;

use kube::ResourceExt;
use kube::runtime::watcher::Event;

use crate::mesh::Name;

/// What an event changed.
#[derive(Debug)]
pub enum Change<K> {
    /// Nothing yet (a list in progress).
    None,
    /// A (re)list completed: compare everything.
    Relisted,
    /// One object changed: `before` is what the cache held, `after` what it holds now
    /// (`None`: deleted).
    Object { before: Option<K>, after: Option<K> },
}

#[derive(Debug)]
pub struct Cache<K> {
    objects: BTreeMap<Name, K>,
    listing: Option<BTreeMap<Name, K>>,
    listed: bool,
}

impl<K> Default for Cache<K> {
    fn default() -> Self {
        Self { objects: BTreeMap::new(), listing: None, listed: false }
    }
}

pub fn name_of<K: ResourceExt>(o: &K) -> Name {
    (o.namespace().unwrap_or_default(), o.name_any())
}

impl<K: ResourceExt + Clone> Cache<K> {
    /// Whether a full list has completed: before that, the cache proves nothing absent.
    pub fn listed(&self) -> bool {
        self.listed
    }

    pub fn get(&self, name: &Name) -> Option<&K> {
        self.objects.get(name)
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = &K> {
        self.objects.values()
    }

    pub fn apply(&mut self, event: Event<K>) -> Change<K> {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                Change::None
            }
            Event::InitApply(o) => {
                self.listing.get_or_insert_default().insert(name_of(&o), o);
                Change::None
            }
            Event::InitDone => {
                self.objects = self.listing.take().unwrap_or_default();
                self.listed = true;
                Change::Relisted
            }
            Event::Apply(o) => {
                let before = self.objects.insert(name_of(&o), o.clone());
                Change::Object { before, after: Some(o) }
            }
            Event::Delete(o) => Change::Object { before: self.objects.remove(&name_of(&o)), after: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(name: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.to_owned());
        c.metadata.namespace = Some("ns".to_owned());
        c
    }

    #[test]
    fn a_relist_replaces_the_cache_only_when_done() {
        let mut cache = Cache::default();
        assert!(matches!(cache.apply(Event::Init), Change::None));
        cache.apply(Event::InitApply(cm("a")));
        assert!(!cache.listed() && cache.is_empty(), "nothing until InitDone");
        assert!(matches!(cache.apply(Event::InitDone), Change::Relisted));
        assert_eq!(cache.len(), 1);
        cache.apply(Event::Init);
        cache.apply(Event::InitApply(cm("b")));
        assert!(cache.get(&("ns".into(), "a".into())).is_some(), "the old list stands while relisting");
        cache.apply(Event::InitDone);
        assert!(cache.get(&("ns".into(), "a".into())).is_none());
        let Change::Object { before, after } = cache.apply(Event::Delete(cm("b"))) else {
            panic!("a change")
        };
        assert!(before.is_some() && after.is_none() && cache.is_empty());
    }
}
