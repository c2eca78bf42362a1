-- Argo CD health check for appconn.io/AppConnection.
--
-- Install it under the argocd-cm key `resource.customizations.health.appconn.io_AppConnection`
-- (see README.md, "Install with Argo CD"). Argo CD runs it with gopher-lua (Lua 5.1);
-- tests/argocd_health.rs runs this file on sample objects.
--
--   Suspended    spec.suspend is true: the operator leaves the connection alone on purpose.
--   Progressing  the operator has not yet reconciled the current generation (no status, no
--                observedGeneration, an older one, or no Ready condition for it yet).
--   Healthy      Ready=True for the current generation.
--   Degraded     Ready=False or Unknown for the current generation, with the condition's message.
--
-- The generation check matters: right after a sync, status still describes the previous spec,
-- and a Ready=True left over from it must not turn the application green.

local hs = {}

local function readyCondition(status)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then
      return condition
    end
  end
  return nil
end

local function conditionMessage(condition)
  if condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  if condition.reason ~= nil and condition.reason ~= "" then
    return condition.reason
  end
  return "Ready is " .. tostring(condition.status)
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local status = obj.status

if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "Reconciliation is suspended (spec.suspend: true)"
  return hs
end

if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile this AppConnection"
  return hs
end

if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. tostring(generation) ..
    " (last reconciled: " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local ready = readyCondition(status)
if ready == nil or (generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition of generation " .. tostring(generation)
  return hs
end

if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = conditionMessage(ready)
  return hs
end

hs.status = "Degraded"
hs.message = conditionMessage(ready)
return hs
