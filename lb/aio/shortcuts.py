"""The event-driven path's two shortcuts past its parsers, each behind one call that either
gives what the parser would have given or returns None and leaves the bytes to the parser.

A keep-alive client repeats its request's header bytes, and a replica repeats its answer's head
(it changes with ``Date``, once a second): parsing them again and working out again what they
mean costs more than the rest of a routed GET. Each shortcut remembers one parse and hands out
its outcome again only for the very same bytes, in the same parser state, under the same limits.
llhttp is a pure function of the bytes it is fed and of where it stands (between two messages
here), so equal input gives equal output; what each shortcut checks below is that the input
really is equal and that no rule the parser's callbacks apply could decide otherwise.

**A request again** (``KnownRequest``; ``lb.aio.server.ClientConnection``):

- *learned* only from a read the parser took as exactly one whole request and nothing else (the
  blank line that ends its head is the read's last four bytes): a ``GET`` in HTTP/1.1 with a
  request line of the plain form (``PLAIN_GET``), keep-alive, no body expected. What is kept is
  the bytes after the request line, blank line included, and what those fields meant
  (``RequestFields``, which depends only on them and on the connection's two ends);
- *taken* only for a read made of a plain ``GET`` request line and exactly those bytes, while
  the connection is between requests and takes more (the caller's ``Phase.BETWEEN``):
  - the method, the version and a single space each side of the target are in the pattern,
    and the target's characters are ones llhttp accepts in any mode (no ``#``, all ASCII), so
    ``check_request_line`` would pass it;
  - the header fields are byte for byte the learned ones: the same count and size limits
    pass, the same refusals (none) and the same keep-alive and framing follow;
  - the request-line limit is checked here to the byte as the parser's callbacks count it
    (``GET`` + target + ``HTTP/1.1`` and two spaces): over it, the parser is left to say 414;
  - the head-size limit (431) is the parser's only while a head is incomplete after a read;
    a whole head in one read never meets it, by either way.

**An answer again** (``AnswerHeads``; ``lb.aio.upstream.ReplicaProtocol``):

- *learned* only from the first read of an answer that the parser took as exactly one whole
  answer: the head (through its first blank line) then a body of the single
  ``Content-Length`` it announced, at most ``largest`` bytes, no interim answer before it, no
  byte after it; and never from the answer to a ``HEAD`` (the caller does not ask);
- *taken* only for the first read of an answer (the parser stands at a message's start: the
  previous answer was read to its end, or the connection is new) that begins with the very
  bytes of a learned head. Its body is then the next ``length`` bytes, in this read or the next
  ones; a read holding more than the body is left to the parser (which refuses what follows
  an answer), and so the caller closes a connection whose later reads overrun the body. The
  limits on answers (head size and fields, ``LB_MAX_REPLY``) depend on the head alone and were
  passed when it was learned.
"""

from __future__ import annotations

import re
import time

from lb.aio.messages import AnswerHead, Request, RequestFields, aim

# A request line the parser takes as it is: GET, an origin-form target of characters llhttp
# accepts in any mode (RFC 3986's unreserved, sub-delims, ":@/?%"), HTTP/1.1.
PLAIN_GET = re.compile(rb"GET (/[A-Za-z0-9._~!$&'()*+,;=:@/?%-]*) HTTP/1\.1")
END_OF_HEAD = b"\r\n\r\n"


class KnownRequest:
    """The header bytes of the last plain ``GET`` the parser read whole on one connection, and
    what they meant."""

    __slots__ = ("fields", "meaning")

    def __init__(self, fields: bytes, meaning: RequestFields) -> None:
        self.fields = fields  # everything after the request line, the blank line included
        self.meaning = meaning

    @classmethod
    def learn(cls, data: bytes, request: Request) -> KnownRequest | None:
        """What ``data``, just parsed as ``request`` and nothing else, teaches: None unless it
        was a whole plain keep-alive ``GET`` with no body."""
        end = data.find(b"\r\n")
        if (request.method != "GET" or request.version != "1.1" or not request.keep_alive
                or request.expects_body or data.find(END_OF_HEAD) != len(data) - 4):
            return None  # not one whole GET alone (pipelined, or a body follows)
        line = PLAIN_GET.fullmatch(data, 0, end)
        if line is None or line.group(1) != request.url:
            return None
        return cls(data[end + 2:], request.fields)

    def again(self, data: bytes, request_line_limit: int) -> Request | None:
        """``data`` as the complete request the parser would make of it, if it is a plain
        ``GET`` with the known header bytes; None for anything else (the parser reads it)."""
        end = data.find(b"\r\n")
        if end < 0 or data[end + 2:] != self.fields:
            return None
        line = PLAIN_GET.fullmatch(data, 0, end)
        if line is None or end > request_line_limit:
            return None  # the parser says what is wrong (or what it makes of the line)
        request = Request(began=time.perf_counter())
        request.url, request.method, request.fields = line.group(1), "GET", self.meaning
        aim(request)
        return request


class AnswerHeads:
    """Answer heads read whole, by their bytes, and what each meant: one memo per worker,
    shared by its replica connections (at most ``kept`` heads, then it starts afresh)."""

    __slots__ = ("_by_bytes", "kept", "largest")

    def __init__(self, kept: int = 256, largest: int = 64 * 1024) -> None:
        self._by_bytes: dict[bytes, AnswerHead] = {}
        self.kept = kept
        self.largest = largest  # bodies up to this size are held whole (the rest streams)

    def __len__(self) -> int:
        return len(self._by_bytes)

    def __contains__(self, head: bytes) -> bool:
        return head in self._by_bytes

    def recall(self, data: bytes) -> tuple[AnswerHead, bytes] | None:
        """The head ``data`` (an answer's first read) begins with, if known, and the body
        bytes that follow it in ``data`` (the whole body, or its beginning); None when the
        parser must read it."""
        end = data.find(END_OF_HEAD) + 4
        if end <= 4:
            return None
        head = self._by_bytes.get(data[:end])
        if head is None or head.length is None:
            return None
        body = data[end:]
        if len(body) > head.length:
            return None  # more than the answer: the parser refuses what follows
        return head, body

    def learn(self, data: bytes, head: AnswerHead, body: bytes) -> None:
        """The parser read ``data``, an answer's first read, as the answer ``head`` with
        ``body``: remembered if that was all of ``data`` and its Content-Length framed it."""
        length = head.length
        if length is None or length > self.largest or len(body) != length:
            return
        end = data.find(END_OF_HEAD) + 4
        if end <= 4 or end + length != len(data):
            return  # an interim answer came first, or bytes after it
        by_bytes = self._by_bytes
        if len(by_bytes) >= self.kept:
            by_bytes.clear()
        by_bytes[data[:end]] = head
