"""Host tests: a real ComfyUI from COMFYUI_PATH (marked ``host`` by tests/conftest.py)."""
