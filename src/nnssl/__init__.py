"""nnssl: self-supervised pretraining of 3D medical image encoders, nnU-Net style.

Importing the package does nothing beyond defining names: environment paths resolve when
used, no logging is configured and no folders are created.
"""

__version__ = "0.1.0"
