"""``python -m onnx_fpgm`` runs the CLI."""
from .cli.main import main

raise SystemExit(main())
