"""The command line: ``onnx-fpgm IN OUT`` (``main``) and ``onnx-fpgm sweep IN`` (``sweep``)."""
