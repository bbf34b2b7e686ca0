"""``python -m acdc_viz``: the same as the ``acdc-viz`` command."""

import sys

from acdc_viz.cli import main

sys.exit(main())
