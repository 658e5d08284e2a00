"""Data: discovery (BUSI, image/mask folder pairs, plain folders), I/O, transforms, splits."""

from busseg.data.busi import BusiIndex, BusiRecord, discover_busi, is_busi_image
from busseg.data.discover import ScanIndex, ScanRecord, detect_layout, discover
from busseg.data.io import read_image, read_mask, to_grey, write_mask_png

__all__ = [
    "BusiIndex",
    "BusiRecord",
    "ScanIndex",
    "ScanRecord",
    "detect_layout",
    "discover",
    "discover_busi",
    "is_busi_image",
    "read_image",
    "read_mask",
    "to_grey",
    "write_mask_png",
]
