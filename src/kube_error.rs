//! Kubernetes API errors as people read them: the API server's own message and code. kube's
//! `Display` of an API error appends the `Debug` dump of its `Status`, which has no place in a
//! log line, an Event, a condition or a command's error.

use std::error::Error as _;

use kube::core::Status;
use kube::runtime::{controller, watcher};

/// One line for a failed Kubernetes API call, e.g. `namespaces "x" not found (HTTP 404 NotFound)`.
pub fn describe(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => status_line(status),
        other => {
            // Transport errors name the outer layer only ("client error (Connect)"): add the
            // innermost cause, which says what happened ("Connection refused").
            let text = other.to_string();
            let mut cause = other.source();
            let mut innermost = None;
            while let Some(inner) = cause {
                innermost = Some(inner.to_string());
                cause = inner.source();
            }
            match innermost {
                Some(inner) if !text.contains(&inner) => format!("{text}: {inner}"),
                _ => text,
            }
        }
    }
}

/// A watch's failure, with the API error inside it described by [`describe`].
pub fn describe_watch(err: &watcher::Error) -> String {
    match err {
        watcher::Error::InitialListFailed(e) => format!("listing failed: {}", describe(e)),
        watcher::Error::WatchStartFailed(e) => format!("cannot start watching: {}", describe(e)),
        watcher::Error::WatchError(status) => {
            format!("the watch ended with an error: {}", status_line(status))
        }
        watcher::Error::WatchFailed(e) => format!("the watch failed: {}", describe(e)),
        other => other.to_string(),
    }
}

/// A controller's failure: the reconciler's own error, or the watch behind its queue described by
/// [`describe_watch`].
pub fn describe_controller<E: std::fmt::Display>(
    err: &controller::Error<E, watcher::Error>,
) -> String {
    match err {
        controller::Error::QueueError(e) => describe_watch(e),
        controller::Error::ReconcilerFailed(e, object) => format!("{object}: {e}"),
        other => other.to_string(),
    }
}

/// The HTTP status code of an API error, if it is one.
pub fn code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn status_line(status: &Status) -> String {
    let message = if status.message.is_empty() {
        "the API server refused the request"
    } else {
        status.message.as_str()
    };
    match (status.code, status.reason.as_str()) {
        (0, "") => message.to_string(),
        (0, reason) => format!("{message} ({reason})"),
        (code, "") => format!("{message} (HTTP {code})"),
        (code, reason) => format!("{message} (HTTP {code} {reason})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_show_message_and_code_only() {
        let status: Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "code": 409, "reason": "AlreadyExists",
            "message": "appconnections.appconn.io \"a\" already exists",
            "details": {"name": "a", "kind": "appconnections"},
        }))
        .unwrap();
        let shown = describe(&kube::Error::Api(Box::new(status)));
        assert_eq!(
            shown,
            "appconnections.appconn.io \"a\" already exists (HTTP 409 AlreadyExists)"
        );
        let bare: Status = serde_json::from_value(serde_json::json!({"code": 500})).unwrap();
        assert_eq!(
            describe(&kube::Error::Api(Box::new(bare))),
            "the API server refused the request (HTTP 500)"
        );
    }
}
