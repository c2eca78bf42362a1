{{/*
The operator's permissions, split by where they can be granted.

"appconn.rbac.namespacedRules": resources that live in the namespaces the operator watches. Granted
by the ClusterRole when every namespace is watched, by one Role per namespace with watchNamespaces.

"appconn.rbac.clusterRules": what is cluster-wide by nature and stays in a ClusterRole either way.

"appconn.rbac.ownNamespaceRules": what the operator needs only in its own namespace (Role there).

Each rule is commented with the call that needs it; tests/manifests.rs compares the union with the
list of calls the controller makes.
*/}}
{{- define "appconn.rbac.namespacedRules" -}}
# Reconciled objects: list/watch feed the cache; get reads the latest copy when the cache may
# lag behind the operator's own writes; patch adds and removes the finalizer appconn.io/cleanup
# and the appconn.io/create-pending marker (JSON patches).
- apiGroups: ["appconn.io"]
  resources: ["appconnections"]
  verbs: ["get", "list", "watch", "patch"]
# AppConnection status: written by server-side apply.
- apiGroups: ["appconn.io"]
  resources: ["appconnections/status"]
  verbs: ["patch"]
# Namespaced backends named by AppConnection.spec.backendRef: cached from a watch.
- apiGroups: ["appconn.io"]
  resources: ["connectionbackends"]
  verbs: ["list", "watch"]
# ConnectionBackend status: the Ready condition from the backend's auth and health check.
- apiGroups: ["appconn.io"]
  resources: ["connectionbackends/status"]
  verbs: ["patch"]
# Secrets: get reads the values an AppConnection or backend references; list/watch follow Secret
# metadata, so a change to a referenced Secret reaches the backend at once, without polling.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# Events on AppConnections and backends (Created, Updated, DriftCorrected, RotationOverdue, ...):
# create, and patch to count a repeated event in its series.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{- define "appconn.rbac.clusterRules" -}}
# ClusterConnectionBackends are cluster-scoped: cached from a watch to resolve
# AppConnection.spec.backendRef.
- apiGroups: ["appconn.io"]
  resources: ["clusterconnectionbackends"]
  verbs: ["list", "watch"]
# ClusterConnectionBackend status: the Ready condition from the backend's auth and health check.
- apiGroups: ["appconn.io"]
  resources: ["clusterconnectionbackends/status"]
  verbs: ["patch"]
# Namespace labels: a ClusterConnectionBackend's namespaceSelector decides which namespaces may
# use it.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
# Store read API: authenticates each caller's bearer token.
- apiGroups: ["authentication.k8s.io"]
  resources: ["tokenreviews"]
  verbs: ["create"]
# Store read API: asks whether the caller may get appconnections/credentials in that namespace.
- apiGroups: ["authorization.k8s.io"]
  resources: ["subjectaccessreviews"]
  verbs: ["create"]
{{- end }}

{{- define "appconn.rbac.ownNamespaceRules" -}}
{{- if .Values.watchNamespaces }}
# The store key Secret: created on first start when absent (create cannot be narrowed to one
# name, hence only in this namespace), and read with get, which the watched namespaces' Roles do
# not grant here.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
{{- else }}
# The store key Secret: created on first start when absent. create cannot be narrowed to one
# name, hence granted only in this namespace; get comes with the cluster-wide Secret access.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
{{- end }}
# Leader election Lease (with replicaCount > 1): read, created once, renewed by update.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "update"]
{{- end }}
