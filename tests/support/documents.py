"""Documents for the knowledge base's tests, made here so no binary file is kept in the tree."""
from __future__ import annotations

import zlib


def pdf_bytes(lines: list[str], title: str = "", *, pages: int = 1, compressed: bool = False,
              in_form: bool = False) -> bytes:
    """A PDF whose text is `lines` (Helvetica), with a correct cross-reference table: `pages`
    pages all drawing the one content stream (deflated when `compressed`, as a bomb is); with
    `in_form`, the text is a form XObject the pages draw (`/Fm0 Do`)."""
    text = " ".join(f"({line.replace('(', '[').replace(')', ']')}) Tj T*" for line in lines)
    stream = f"BT /F1 12 Tf 14 TL 72 720 Td {text} ET".encode("latin-1")
    filters = b""
    if compressed:
        stream, filters = zlib.compress(stream, 9), b" /Filter /FlateDecode"
    info = f"<< /Title ({title}) >>" if title else "<< >>"
    text_object = b"<< /Length %d%s >>\nstream\n" % (len(stream), filters) + stream + b"\nendstream"
    resources = b"/Font << /F1 3 0 R >>"
    if in_form:
        form, content = text_object, b"/Fm0 Do"  # the last operator: nothing after it on the page
        text_object = b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream"
        form = form.replace(b"<< /Length", b"<< /Type /XObject /Subtype /Form /BBox [0 0 612 792]"
                                           b" /Resources << /Font << /F1 3 0 R >> >> /Length", 1)
        resources += b" /XObject << /Fm0 6 0 R >>"
    first_page = 7  # objects 1-6 below, then the pages
    kids = " ".join(f"{first_page + n} 0 R" for n in range(pages)).encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        text_object,
        info.encode("latin-1"),
        form if in_form else b"<< >>",  # the form XObject, or nothing (keeps the numbering plain)
    ] + [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
         b" /Resources << %s >> >>" % resources] * pages
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
