"""DICOM files built in the tests from real X-rays' pixels, as PACS exports write them, with identifying header
values planted (PLANTED) for the privacy checks to look for."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

# What a header says of a patient and a study: none of it may reach an output under tracking.privacy: strict
PLANTED = {"PatientName": "Quixote^Dulcinea", "PatientBirthDate": "19580923", "StudyDate": "20170611",
           "InstitutionName": "Sanatorio Zyxwv", "ReferringPhysicianName": "Kovalenko^Yaroslava",
           "AccessionNumber": "ACC99173355"}


def dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 8, patient: str = "MRN-40917733",
            **extra: object) -> Dataset:
    """A digital X-ray of `pixels` (stored as they are, `bits` of them), uncompressed, with PLANTED's values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID = "DX", patient
    for key, value in (PLANTED | extra).items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (8 if bits == 8 else 16), bits, bits - 1
    ds.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    return ds


def encode(ds: Dataset, syntax: str | None = None) -> bytes:
    if syntax:
        ds.compress(syntax)  # pydicom's RLE encoder; JPEG 2000 through pylibjpeg-openjpeg
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def monochrome1(gray: np.ndarray, **kw: object) -> Dataset:
    """12-bit, white = air, a rescale and two windows: the first spans the data, so it shows `gray` again; the
    second (a narrow one) must not be the one used."""
    stored = (255 - gray.astype(np.uint16)) * 16 + 8
    return dataset(stored, "MONOCHROME1", 12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=[1024, 300],
                   WindowWidth=[4096, 600], **kw)


# name: 8-bit gray image -> DICOM bytes; each must prepare to the same array as the image it came from
KINDS: dict[str, Callable[..., bytes]] = {
    "MONOCHROME2 8-bit": lambda g, **kw: encode(dataset(g, **kw)),
    "MONOCHROME1 12-bit, windowed": lambda g, **kw: encode(monochrome1(g, **kw)),
    "MONOCHROME2 12-bit, no window": lambda g, **kw: encode(dataset(g.astype(np.uint16) * 16 + 8, bits=12, **kw)),
    "RLE Lossless": lambda g, **kw: encode(dataset(g, **kw), RLELossless),
    "JPEG 2000 Lossless": lambda g, **kw: encode(monochrome1(g, **kw), JPEG2000Lossless),
}
