"""The decoded size an instance's header declares: one formula for the SCP's 0xA700
refusal and forwarding's decompression bound, None for a malformed header."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from deid_node.deid.pixelsize import declared_decoded_bytes
from deid_node.errors import ForwardError
from deid_node.forward import Outgoing, _payload


def header(**values) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        if isinstance(value, bytes):  # as read from a file: validated only when read
            tag = Tag(keyword)
            ds[tag] = RawDataElement(tag, "IS", len(value), value, 0, True, True)
        else:
            setattr(ds, keyword, value)
    return ds


def test_declared_decoded_bytes_counts_whole_bytes_per_sample():
    assert declared_decoded_bytes(header(Rows=512, Columns=256, BitsAllocated=16)) == 262144
    rgb = header(Rows=10, Columns=10, BitsAllocated=8, SamplesPerPixel=3, NumberOfFrames=b"4")
    assert declared_decoded_bytes(rgb) == 1200
    # BitsAllocated 1 decodes to one byte a pixel.
    assert declared_decoded_bytes(header(Rows=8, Columns=8, BitsAllocated=1)) == 64


def test_declared_decoded_bytes_is_none_for_a_malformed_header():
    assert declared_decoded_bytes(header(Columns=8, BitsAllocated=8)) is None
    assert declared_decoded_bytes(header(Rows=0, Columns=8, BitsAllocated=8)) is None
    assert (
        declared_decoded_bytes(header(Rows=8, Columns=8, BitsAllocated=8, NumberOfFrames=b"-2"))
        is None
    )
    multi = header(Rows=8, Columns=8, BitsAllocated=8, NumberOfFrames=b"2\\3")
    assert declared_decoded_bytes(multi) is None


def test_forwarding_refuses_to_decompress_a_header_without_valid_attributes(tmp_path):
    """A compressed instance whose NumberOfFrames is not an integer, to a destination that
    takes only uncompressed: a ForwardError naming the reason, not a crash."""
    ds = dcmread(get_testdata_file("JPEG2000.dcm"))
    ds.NumberOfFrames = 1
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    # NumberOfFrames (0028,0008) IS, explicit VR little endian: value "1 " -> "x "
    marker = b"\x28\x00\x08\x00IS\x02\x001 "
    assert raw.count(marker) == 1
    path.write_bytes(raw.replace(marker, b"\x28\x00\x08\x00IS\x02\x00x "))
    item = Outgoing(1, path, "1.2.3", "1.2", "1.2.1")
    pair = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    accepted = {(str(ds.SOPClassUID), ExplicitVRLittleEndian)}
    with pytest.raises(ForwardError, match="without valid"):
        _payload(item, pair, accepted, 100 * 2**20)
