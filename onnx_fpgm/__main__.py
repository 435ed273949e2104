"""``python -m onnx_fpgm`` runs the CLI."""
from .cli import main

raise SystemExit(main())
