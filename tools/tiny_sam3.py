"""SAM3 in the tests: why there is no tiny stand-in, and how the SAM3 workflow runs without one.

ComfyUI (0.33.0) builds SAM3 from a fixed architecture whatever the file
holds: its detection (``comfy.model_detection``: the
``detector.backbone.vision_backbone.trunk.blocks.0.attn.qkv.weight`` and
``detector.transformer.decoder.query_embed.weight`` keys) sets only
``{"image_model": "SAM3"}`` (or ``"SAM31"``), and ``comfy.ldm.sam3.detector.SAM3Model``
then builds the ViTDet trunk at its defaults (32 blocks, width 1024, 16 heads,
1008 x 1008 input), the 6 + 6-layer detector transformer and the tracker: 507 M
parameters (SAM3.1: 520 M), counted on ComfyUI 0.33.0; no size is read from the
weights. A smaller file loads with missing weights (uninitialised memory), not a
smaller model, and the full-size seeded model would be 1 GB in fp16 and take a
minute or more per image on the test machine's CPU.

So the tests check SAM3's side in two parts:

* ``tests/host/test_sam3_nodes_host.py`` runs the host's own ``SAM3_Detect``
  in-process with a stand-in segmenter in place of the network (it marks a disc
  where SAM3 is told to look), so the point coordinates are checked through
  SAM3_Detect's own code;
* the shipped ``warp_inpaint_sam3`` workflow runs headless with the SAM3 branch
  fed otherwise (:func:`feed_sam3_mask`): its Load Checkpoint (SAM3) and SAM3
  Detect are replaced by a Load Image (as Mask) of a known mask, and everything
  else -- the editor, Combine SAM3 Mask, Drag Warp (pixels) and the SD1.5
  inpainting chain on the tiny stand-ins -- runs as shipped.
"""

from __future__ import annotations

SAM3_NODE = "SAM3_Detect"


def feed_sam3_mask(prompt: dict, mask_name: str) -> list[str]:
    """Replace each SAM3 Detect of an API ``prompt`` (and its loader) by LoadImageMask of ``mask_name`` (input folder).

    Whatever read SAM3 Detect's masks (output 0) reads the mask image's alpha-free
    luminance instead (channel ``red``, as a black/white PNG holds it); the
    checkpoint loader that fed only SAM3 Detect is removed. Returns the ids of the
    replaced SAM3 Detect nodes (empty when the prompt has none).
    """
    replaced = [node_id for node_id, node in prompt.items() if node["class_type"] == SAM3_NODE]
    for node_id in replaced:
        loader = prompt[node_id]["inputs"]["model"][0]
        prompt[node_id] = {"class_type": "LoadImageMask", "inputs": {"image": mask_name, "channel": "red"},
                           "_meta": {"title": "SAM3 mask (stand-in)"}}
        readers = [n for n in prompt.values() for v in n["inputs"].values() if isinstance(v, list) and v[0] == loader]
        if not readers:
            del prompt[loader]
    return replaced
