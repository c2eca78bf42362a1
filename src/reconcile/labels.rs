//! Label selector matching, for a `ClusterConnectionBackend`'s `conditions.namespaceSelector`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy the selector (an empty selector matches everything).
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_and_expressions() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("team", "data")])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "env".into(),
                operator: "In".into(),
                values: Some(vec!["prod".into(), "stage".into()]),
            }]),
        };
        assert!(matches(
            &selector,
            &labels(&[("team", "data"), ("env", "prod")])
        ));
        assert!(!matches(
            &selector,
            &labels(&[("team", "data"), ("env", "dev")])
        ));
        assert!(!matches(&selector, &labels(&[("env", "prod")])));
        assert!(matches(&LabelSelector::default(), &labels(&[])));
        let unknown = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "a".into(),
                operator: "Sometimes".into(),
                values: None,
            }]),
        };
        assert!(
            !matches(&unknown, &labels(&[("a", "b")])),
            "an unknown operator matches nothing"
        );
    }
}
