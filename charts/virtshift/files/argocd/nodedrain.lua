-- Argo CD health check for NodeDrain (virtshift.io/v1alpha1), from its kstatus conditions.
-- Progressing: not observed yet, Reconciling, Terminating; Degraded: Stalled (a VM could not
-- move, the deadline passed, a conflict); Suspended: paused; Healthy: Ready (drained, or a
-- dryRun plan).
local hs = {status = "Progressing", message = "Waiting for virtshift to observe this NodeDrain"}
if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.message = "Ending maintenance: aborting migrations and uncordoning"
  return hs
end
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata.generation or 0
if obj.status.observedGeneration ~= nil and obj.status.observedGeneration < generation then
  hs.message = "Waiting for virtshift to observe generation " .. generation
  return hs
end
local cond = {}
for _, c in ipairs(obj.status.conditions) do
  cond[c.type] = c
end
local function says(c)
  local text = c.reason or ""
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end
if obj.status.phase == "Conflict" then
  hs.status = "Degraded"
  hs.message = says(cond["Ready"] or {reason = "Conflict"})
  return hs
end
if cond["Stalled"] ~= nil and cond["Stalled"].status == "True" then
  hs.status = "Degraded"
  hs.message = says(cond["Stalled"])
  return hs
end
if cond["Ready"] ~= nil and cond["Ready"].status == "True" then
  hs.status = "Healthy"
  hs.message = says(cond["Ready"])
  return hs
end
if obj.spec ~= nil and obj.spec.paused == true then
  hs.status = "Suspended"
  hs.message = "Paused: " .. (obj.status.progress or "")
  return hs
end
hs.status = "Progressing"
if cond["Reconciling"] ~= nil then
  hs.message = says(cond["Reconciling"])
end
if obj.status.progress ~= nil then
  hs.message = obj.status.progress .. " VMs done; " .. hs.message
end
return hs
