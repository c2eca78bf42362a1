//! A small map of field names to values, kept as one sorted vector.
//!
//! The operator caches every AppConnection; a `BTreeMap` allocates room for eleven entries per
//! node however few there are, which made a connection's handful of credential fields most of
//! its cached size. On the wire and in the schema this is a JSON object, as before.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Field name -> value, sorted by name, each name once.
#[derive(Clone, PartialEq, Eq)]
pub struct FieldMap<V> {
    entries: Vec<(String, V)>,
}

impl<V> Default for FieldMap<V> {
    fn default() -> Self {
        FieldMap {
            entries: Vec::new(),
        }
    }
}

impl<V> FieldMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn position<Q>(&self, key: &Q) -> Result<usize, usize>
    where
        String: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.entries.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        String: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.position(key).ok().map(|i| &self.entries[i].1)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        String: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.position(key).is_ok()
    }

    /// Sets `key` to `value`; returns the value it replaces.
    pub fn insert(&mut self, key: String, value: V) -> Option<V> {
        match self.position(key.as_str()) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        String: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.position(key).ok().map(|i| self.entries.remove(i).1)
    }

    /// The entries in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.entries.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }
}

impl<V> FromIterator<(String, V)> for FieldMap<V> {
    /// Like a `BTreeMap`: sorted, and a name given twice keeps its last value.
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        let mut entries: Vec<(String, V)> = iter.into_iter().collect();
        // A stable sort keeps the order of equal names, so the last one given is last.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut deduped: Vec<(String, V)> = Vec::with_capacity(entries.len());
        for entry in entries {
            match deduped.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => deduped.push(entry),
            }
        }
        deduped.shrink_to_fit();
        FieldMap { entries: deduped }
    }
}

impl<V, const N: usize> From<[(String, V); N]> for FieldMap<V> {
    fn from(entries: [(String, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl<V> From<BTreeMap<String, V>> for FieldMap<V> {
    fn from(map: BTreeMap<String, V>) -> Self {
        map.into_iter().collect()
    }
}

impl<'a, V> IntoIterator for &'a FieldMap<V> {
    type Item = (&'a String, &'a V);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (String, V)>, fn(&'a (String, V)) -> Self::Item>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl<V> IntoIterator for FieldMap<V> {
    type Item = (String, V);
    type IntoIter = std::vec::IntoIter<(String, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl<V: fmt::Debug> fmt::Debug for FieldMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V: Serialize> Serialize for FieldMap<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for FieldMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldMapVisitor<V>(std::marker::PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for FieldMapVisitor<V> {
            type Value = FieldMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
                while let Some(entry) = access.next_entry::<String, V>()? {
                    entries.push(entry);
                }
                Ok(entries.into_iter().collect())
            }
        }

        deserializer.deserialize_map(FieldMapVisitor(std::marker::PhantomData))
    }
}

/// The schema of the `BTreeMap` it stands for: an object whose properties are `V`.
impl<V: JsonSchema> JsonSchema for FieldMap<V> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        <BTreeMap<String, V>>::schema_name()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        <BTreeMap<String, V>>::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <BTreeMap<String, V>>::json_schema(generator)
    }

    fn inline_schema() -> bool {
        <BTreeMap<String, V>>::inline_schema()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn reads_and_writes_a_json_object_in_name_order() {
        let map: FieldMap<Value> =
            serde_json::from_value(json!({"port": 1433, "host": "db", "user": "app"})).unwrap();
        assert_eq!(map.keys().collect::<Vec<_>>(), ["host", "port", "user"]);
        assert_eq!(map.get("port"), Some(&json!(1433)));
        assert!(map.contains_key("user") && !map.contains_key("password"));
        assert_eq!(
            serde_json::to_string(&map).unwrap(),
            r#"{"host":"db","port":1433,"user":"app"}"#
        );
        assert!(serde_json::from_value::<FieldMap<Value>>(json!(["host"])).is_err());
    }

    #[test]
    fn behaves_like_a_btree_map() {
        let pairs = [("b", 1), ("a", 2), ("b", 3), ("c", 4)].map(|(k, v)| (k.to_string(), v));
        let ours: FieldMap<i32> = pairs.clone().into_iter().collect();
        let theirs: BTreeMap<String, i32> = pairs.into_iter().collect();
        assert_eq!(
            ours.iter().collect::<Vec<_>>(),
            theirs.iter().collect::<Vec<_>>(),
            "sorted, and a repeated name keeps its last value"
        );
        let mut ours = ours;
        assert_eq!(ours.insert("a".into(), 9), Some(2));
        assert_eq!(ours.insert("aa".into(), 5), None);
        assert_eq!(ours.remove("c"), Some(4));
        assert_eq!(
            ours.into_iter().collect::<Vec<_>>(),
            [("a".into(), 9), ("aa".into(), 5), ("b".into(), 3)]
        );
    }

    #[test]
    fn has_the_schema_of_the_map_it_stands_for() {
        assert_eq!(
            schemars::schema_for!(FieldMap<i32>),
            schemars::schema_for!(BTreeMap<String, i32>)
        );
    }
}
