"""`python -m vqa.cli COMMAND ...` (how torchrun starts a command: `torchrun ... -m vqa.cli pretrain ...`)."""
import sys

from . import main

sys.exit(main())
