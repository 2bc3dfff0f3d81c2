"""The shipped workflows the headless runner refuses, with why (read by the runner, the workflow generator and the GPU check)."""

NOT_FOR_THE_RUNNER = {
    "warp_inpaint_sam3.json": "its SAM3 checkpoint loads beside the inpainting one, and the runner's --checkpoint "
                              "fills one Load Checkpoint (no tiny SAM3 exists: the loader builds it at full size)",
    "drag_to_video_wanmove.json": "it needs Wan 2.1 I2V, its umt5-xxl text encoder and CLIP vision, which the runner "
                                  "cannot place (and which have no tiny stand-ins)",
}
"""Shipped workflows the headless runner refuses, with why: open them in ComfyUI (their tests run them on the
host with stand-ins of their own: tests/host/test_sam3_workflow_host.py, tests/host/test_wanmove_host.py)."""
