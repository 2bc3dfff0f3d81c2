"""DragKit's headless runner: run the shipped workflows outside the ComfyUI window, one sample or a batch.

Never imported by the nodes (the pack's ``__init__.py`` loads ``nodes/`` only).
"""
