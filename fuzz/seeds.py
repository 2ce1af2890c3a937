"""Write the hand-made seed scripts into ``fuzz/corpus/`` (``python fuzz/seeds.py``).

Each seed reaches one state honestly and corrupts the wire there, so the
fuzzer starts from every state the target can reach: fresh, mid-handshake,
paused (handshake and record pauses), established, after close_notify, and
dropped while paused.  The fuzzer's finds are merged beside them
(``fuzz/README.md``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from fuzz_connection import Action as A
from fuzz_connection import Config as C
from fuzz_connection import CutOp, PeerOp, encode, run_one

CLIENT, SERVER = True, False
#: the whole life of a connection: handshake, data both ways, close_notify both ways
LIFE = ((A.HONEST,), (A.PEER_OP, PeerOp.WRITE, b"ab"), (A.SETTLE,),
        (A.CUT_OP, CutOp.WRITE, b""), (A.PEER,), (A.PEER_OP, PeerOp.SHUTDOWN, b""),
        (A.SETTLE,), (A.CUT_OP, CutOp.SHUTDOWN, b""), (A.PEER,))
JUNK = bytes(range(7, 7 + 40))

SEEDS: dict[str, bytes] = {
    **{f"life-{c.name.lower()}-{'client' if side else 'server'}": encode(c, side, *LIFE)
       for c in C for side in (SERVER, CLIENT)},
    # mid-handshake: one honest flight, then a corrupted one
    "handshake-overwrite-server": encode(C.TLS13_PLAIN, SERVER, (A.PEER,),
                                         (A.OVERWRITE, 60, b"\xff\x00\x13"), (A.SETTLE,),
                                         (A.PEER,), (A.SETTLE,)),
    "handshake-overwrite-client": encode(C.TLS13_PLAIN, CLIENT, (A.CUT,), (A.PEER,),
                                         (A.OVERWRITE, 100, b"\x00\x17"), (A.SETTLE,)),
    "handshake-flip-tls12-client": encode(C.TLS12_PLAIN, CLIENT, (A.CUT,), (A.PEER,),
                                          (A.FLIP, 300, 3), (A.SETTLE,), (A.PEER,),
                                          (A.SETTLE,)),
    "handshake-truncated-server": encode(C.TLS13_PLAIN, SERVER, (A.PEER,), (A.DELETE, 20, 255),
                                         (A.SETTLE,), (A.CUT_OP, CutOp.EOF, b""), (A.SETTLE,)),
    "fresh-plaintext-records-server": encode(C.TLS13_PLAIN, SERVER,
                                             (A.RECORD, 2, b"\x01\x00\x00\x05" + JUNK[:5]),
                                             (A.RECORD, 0, b"\x01"), (A.SETTLE,)),
    "fresh-raw-client": encode(C.TLS12_PLAIN, CLIENT, (A.CUT,), (A.RAW, JUNK), (A.SETTLE,)),
    # paused: hostile bytes fed while the job is paused, then the job resumed
    "paused-handshake-feed-server": encode(C.TLS13_HANDSHAKE_PAUSE, SERVER, (A.PEER,), (A.CUT,),
                                           (A.RECORD, 1, b"\x02\x28"), (A.FEED,),
                                           (A.CUT_OP, CutOp.READ, b""), (A.SETTLE,),
                                           (A.PEER,), (A.SETTLE,)),
    "paused-handshake-feed-client": encode(C.TLS13_MUTUAL, CLIENT, (A.CUT,), (A.PEER,), (A.CUT,),
                                           (A.RAW, JUNK), (A.FEED,), (A.SETTLE,), (A.PEER,)),
    "paused-read-feed-server": encode(C.TLS13_RECORD_PAUSES, SERVER, (A.HONEST,),
                                      (A.PEER_OP, PeerOp.WRITE, b"x"), (A.CUT,),
                                      (A.PEER_OP, PeerOp.WRITE, b"y"), (A.FLIP, 30, 1),
                                      (A.FEED,), (A.CUT_OP, CutOp.WRITE, b"z"), (A.SETTLE,)),
    "paused-write-feed-client": encode(C.TLS12_RECORD_PAUSES, CLIENT, (A.HONEST,),
                                       (A.CUT_OP, CutOp.WRITE, b"w"),
                                       (A.RECORD, 3, JUNK), (A.FEED,),
                                       (A.CUT_OP, CutOp.WRITE, b"other"), (A.SETTLE,),
                                       (A.SETTLE,)),
    "paused-shutdown-alert-server": encode(C.TLS12_MUTUAL_PAUSES, SERVER, (A.HONEST,),
                                           (A.CUT_OP, CutOp.SHUTDOWN, b""),
                                           (A.RECORD, 1, b"\x02\x0a"), (A.FEED,),
                                           (A.SETTLE,), (A.PEER,)),
    "paused-dropped-server": encode(C.TLS13_RECORD_PAUSES, SERVER, (A.HONEST,),
                                    (A.PEER_OP, PeerOp.WRITE, b"x"), (A.CUT,), (A.DROP,)),
    "paused-handshake-dropped-client": encode(C.TLS13_MUTUAL, CLIENT, (A.CUT,), (A.PEER,),
                                              (A.CUT,), (A.DROP,)),
    # the engine misbehaves
    "fault-err-server": encode(C.TLS13_HANDSHAKE_PAUSE, SERVER, (A.FAULT, 1), (A.HONEST,)),
    "fault-eagain-early-client": encode(C.TLS12_MUTUAL_PAUSES, CLIENT, (A.FAULT, 0),
                                        (A.FAULT, 2), (A.HONEST,), (A.FAULT, 3),
                                        (A.CUT_OP, CutOp.WRITE, b"d"), (A.SETTLE,)),
    # established, then corrupted records, KeyUpdate, EOF
    "established-bad-record-client": encode(C.TLS13_PLAIN, CLIENT, (A.HONEST,),
                                            (A.PEER_OP, PeerOp.WRITE, b"x"),
                                            (A.OVERWRITE, 8, b"\x00"), (A.SETTLE,)),
    "established-key-update-server": encode(C.TLS13_RECORD_PAUSES, SERVER, (A.HONEST,),
                                            (A.PEER_OP, PeerOp.KEY_UPDATE, b"1"), (A.SETTLE,),
                                            (A.CUT_OP, CutOp.KEY_UPDATE, b""),
                                            (A.CUT_OP, CutOp.WRITE, b"k"), (A.PEER,)),
    "established-eof-tls12-server": encode(C.TLS12_PLAIN, SERVER, (A.HONEST,),
                                           (A.CUT_OP, CutOp.EOF, b""), (A.SETTLE,),
                                           (A.CUT_OP, CutOp.WRITE, b"")),
    # after close_notify
    "closed-then-records-client": encode(C.TLS13_PLAIN, CLIENT, (A.HONEST,),
                                         (A.PEER_OP, PeerOp.SHUTDOWN, b""), (A.SETTLE,),
                                         (A.RECORD, 3, JUNK), (A.SETTLE,),
                                         (A.CUT_OP, CutOp.SHUTDOWN, b""),
                                         (A.CUT_OP, CutOp.WRITE, b"late")),
    "closed-then-handshake-record-server": encode(C.TLS12_RECORD_PAUSES, SERVER, (A.HONEST,),
                                                  (A.CUT_OP, CutOp.SHUTDOWN, b""),
                                                  (A.SETTLE,), (A.RECORD, 2, b"\x00\x00\x00\x00"),
                                                  (A.CUT,), (A.CUT_OP, CutOp.READ_ZERO, b"")),
}


def main() -> None:
    folder = Path(__file__).parent / "corpus"
    folder.mkdir(exist_ok=True)
    for name, script in SEEDS.items():
        run_one(script)   # every seed is a passing input
        (folder / f"seed-{name}").write_bytes(script)
    print(f"{len(SEEDS)} seeds written to {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
