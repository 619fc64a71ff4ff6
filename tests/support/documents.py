"""Documents for the knowledge base's tests, made here so no binary file is kept in the tree."""
from __future__ import annotations

import zlib


def pdf_bytes(lines: list[str], title: str = "", *, pages: int = 1, compressed: bool = False) -> bytes:
    """A PDF whose text is `lines` (Helvetica), with a correct cross-reference table: `pages`
    pages all drawing the one content stream (deflated when `compressed`, as a bomb is)."""
    text = " ".join(f"({line.replace('(', '[').replace(')', ']')}) Tj T*" for line in lines)
    stream = f"BT /F1 12 Tf 14 TL 72 720 Td {text} ET".encode("latin-1")
    stream_dict = b"<< /Length %d >>" % len(stream)
    if compressed:
        stream = zlib.compress(stream, 9)
        stream_dict = b"<< /Length %d /Filter /FlateDecode >>" % len(stream)
    info = f"<< /Title ({title}) >>" if title else "<< >>"
    first_page = 7  # objects 1-6 below, then the pages
    kids = " ".join(f"{first_page + n} 0 R" for n in range(pages)).encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        stream_dict + b"\nstream\n" + stream + b"\nendstream",
        info.encode("latin-1"),
        b"<< >>",  # unused: keeps the numbering plain
    ] + [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
         b" /Resources << /Font << /F1 3 0 R >> >> >>"] * pages
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 5 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
