-- Argo CD health check for MigrationPolicy (migrationpolicies.virtshift.io/v1alpha1).
-- Progressing until virtshift has observed the current generation; Healthy when Ready;
-- Degraded when Ready is False (an unusable window, a conflicting KubeVirt policy, ...).
local hs = {status = "Progressing", message = "Waiting for virtshift to observe this policy"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata.generation or 0
if obj.status.observedGeneration ~= nil and obj.status.observedGeneration < generation then
  hs.message = "Waiting for virtshift to observe generation " .. generation
  return hs
end
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then
    local text = (c.reason or "") .. ": " .. (c.message or "")
    if c.status == "True" then
      hs.status = "Healthy"
    elseif c.status == "False" then
      hs.status = "Degraded"
    end
    hs.message = text
    return hs
  end
end
return hs
