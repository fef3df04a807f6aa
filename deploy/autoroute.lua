-- Orthanc auto-routing: send each series that has become stable to the bone-imaging node.
--
-- Orthanc calls OnStableSeries once no instance of a series arrived for "StableAge" seconds
-- (see orthanc.json). Late instances make the series stable again, so they are sent too and the
-- node re-opens the study and replaces its results. The node's own results (series descriptions
-- starting with "AI ") are never sent back, so nothing loops. The node decides per series whether
-- a route matches (modality, body part, age ...); a series without a matching route costs only
-- the transfer.

local NODE_MODALITY = 'bonenode'   -- the key under DicomModalities in orthanc.json

function OnStableSeries(seriesId, tags, metadata)
  local description = tags['SeriesDescription'] or ''
  if string.sub(description, 1, 3) == 'AI ' then
    return
  end
  print('autoroute: sending series ' .. seriesId .. ' to ' .. NODE_MODALITY)
  -- an asynchronous job: when the node is down the job fails and can be resubmitted under /jobs
  local body = '{"Resources": ["' .. seriesId .. '"], "Asynchronous": true}'
  RestApiPost('/modalities/' .. NODE_MODALITY .. '/store', body)
end
