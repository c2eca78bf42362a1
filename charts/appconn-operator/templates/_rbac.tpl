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
# Reconciled objects: watched (get/list/watch); metadata changed with patch (finalizer
# appconn.io/cleanup) and update (the appconn.io/create-pending marker is written with an
# optimistic lock, so it never overwrites a newer object).
- apiGroups: ["appconn.io"]
  resources: ["appconnections"]
  verbs: ["get", "list", "watch", "patch", "update"]
# AppConnection status: written by server-side apply (patch); get and update for reading and
# replacing it under a resourceVersion check.
- apiGroups: ["appconn.io"]
  resources: ["appconnections/status"]
  verbs: ["get", "patch", "update"]
# Clusters running the OwnerReferencesPermissionEnforcement admission plugin (OpenShift) check
# update on this subresource before a controller may manage the object's finalizers.
- apiGroups: ["appconn.io"]
  resources: ["appconnections/finalizers"]
  verbs: ["update"]
# Namespaced backends named by AppConnection.spec.backendRef: watched to resolve the reference.
- apiGroups: ["appconn.io"]
  resources: ["connectionbackends"]
  verbs: ["get", "list", "watch"]
# ConnectionBackend status: the Ready condition from the backend's auth and health check.
- apiGroups: ["appconn.io"]
  resources: ["connectionbackends/status"]
  verbs: ["patch"]
# Secrets: get reads the values an AppConnection or backend references; list/watch follow Secret
# metadata, so a change to a referenced Secret reaches the backend at once, without polling.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# Events on AppConnections and backends (Created, Updated, DriftCorrected, RotationOverdue, ...).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{- define "appconn.rbac.clusterRules" -}}
# ClusterConnectionBackends are cluster-scoped: watched to resolve AppConnection.spec.backendRef.
- apiGroups: ["appconn.io"]
  resources: ["clusterconnectionbackends"]
  verbs: ["get", "list", "watch"]
# ClusterConnectionBackend status: the Ready condition from the backend's auth and health check.
- apiGroups: ["appconn.io"]
  resources: ["clusterconnectionbackends/status"]
  verbs: ["patch"]
# Namespace labels: a ClusterConnectionBackend's namespaceSelector decides which namespaces may
# use it.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
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
