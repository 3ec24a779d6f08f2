"""Micro-benchmark of the MQTT codec's hot path: µs per operation, best of N rounds.

    python -m bench.codec                  # the codec as imported (pure Python or compiled)
    python -m bench.codec --rounds 15 --number 20000
    python -m bench.codec --mqtt5          # also the `mqtt5` package (Rust), with the
                                           # conversion to and from our Publish

The cases run interleaved, round after round, in one process, so a burst of other load on
a shared machine hits every case alike; each case keeps its best round (timeit's advice:
the minimum is the run least disturbed, the others measure the machine, not the code).
The codec is imported as ``bridge.mqtt_codec``: put a compiled build first on
``PYTHONPATH`` to time it against the same cases (``bench/README.md``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from bridge import mqtt_codec as codec
from bridge.route_index import RouteIndex
from bridge.routing import TopicFilter, TopicTemplate

TOPIC = b"devices/7f3a9c21/telemetry"
PAYLOAD = bytes(range(200))
PACKET_ID = 4242
# Shapes a device fleet sends: an expiry, one user property, a content type.
PROPS: codec.Properties = {
    codec.MESSAGE_EXPIRY: 3600,
    codec.CONTENT_TYPE: "application/json",
    codec.USER_PROPERTY: [("trace-id", "4bf92f3577b34da6a3ce929d0e0e4736")],
}
BIG_PAYLOAD = 65_536  # large messages: IoT Core takes up to 128 KB
# What the bridge adds to every message it republishes (pipeline.py encodes it once).
MARKER: codec.Properties = {codec.USER_PROPERTY: [("mqtt-bridge-hop", "dtb-0")]}
# What a read delivers at full speed: many PUBLISHes back to back.
PACKETS_PER_READ = 100

Case = Callable[[], object]


def _framed(packet: bytes) -> tuple[bytearray, int, int, int]:
    """The packet in a read buffer, as ``MqttConnection._parse`` sees it."""
    buf = bytearray(packet)
    found = codec.split_packet(buf, 0)
    assert found is not None
    first, start, end = found
    return buf, first, start, end


def load_codec(path: str) -> ModuleType:
    """Another version of ``mqtt_codec.py`` (``git show REV:bridge/mqtt_codec.py > FILE``),
    to time it in the same process as the current one: the fair before/after."""
    spec = importlib.util.spec_from_file_location("codec_against", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def codec_cases(codec: ModuleType = codec, label: str = "") -> dict[str, Case]:
    v5 = codec.PROTOCOL_5
    plain = codec.encode_publish(TOPIC, PAYLOAD, 1, False, PACKET_ID, v5)
    with_props = codec.encode_publish(TOPIC, PAYLOAD, 1, False, PACKET_ID, v5, PROPS)
    buf0, first0, start0, end0 = _framed(plain)
    buf1, first1, start1, end1 = _framed(with_props)
    big = codec.encode_publish(TOPIC, bytes(BIG_PAYLOAD), 1, False, PACKET_ID, v5, PROPS)
    buf2, first2, start2, end2 = _framed(big)
    read = bytearray(plain * PACKETS_PER_READ)
    size = len(read)
    marker = codec.encode_properties(MARKER)
    decode = codec.decode_publish_at
    encode = codec.encode_publish
    split = codec.split_packet

    def frame_read() -> None:
        pos = 0
        while (found := split(read, pos, size)) is not None:
            pos = found[2]

    def parse_read() -> None:
        pos = 0
        while (found := split(read, pos, size)) is not None:
            first, start, pos = found
            decode(read, first, start, pos, v5)

    per_read = float(PACKETS_PER_READ)
    cases: dict[str, Case] = {
        "decode publish, no properties": lambda: decode(buf0, first0, start0, end0, v5),
        "decode publish, 3 properties": lambda: decode(buf1, first1, start1, end1, v5),
        "decode publish, 3 properties, 64 KiB": lambda: decode(buf2, first2, start2, end2, v5),
        "encode publish, no properties": lambda: encode(TOPIC, PAYLOAD, 1, False, 1, v5),
        "encode publish, 3 properties": lambda: encode(TOPIC, PAYLOAD, 1, False, 1, v5, PROPS),
        "encode publish, hop marker pre-encoded": lambda: encode(
            TOPIC, PAYLOAD, 1, False, 1, v5, marker
        ),
        f"frame a read of {PACKETS_PER_READ} (per packet)": _per(frame_read, per_read),
        f"frame+decode a read of {PACKETS_PER_READ} (per packet)": _per(parse_read, per_read),
    }
    return {label + name: case for name, case in cases.items()}


@dataclass(frozen=True)
class _Route:
    filter: TopicFilter
    template: TopicTemplate


def routing_cases(count: int = 500) -> dict[str, Case]:
    """Routing, compiled along with the codec: ``count`` routes, traffic on the last."""
    routes = []
    for i in range(count - 1):
        source = TopicFilter.parse(f"fleet{i}/+/telemetry")
        routes.append(_Route(source, TopicTemplate.parse(f"dt/{i}/{{1}}", source)))
    last = TopicFilter.parse("devices/+/telemetry")
    routes.append(_Route(last, TopicTemplate.parse("dt/{1}/telemetry", last)))
    index = RouteIndex(routes)
    topic = TOPIC.decode()

    def miss() -> object:
        # What a topic not yet in the cache costs: the trie walk, captures, the template.
        route = routes[index.first(topic) or 0]
        captures = route.filter.captures(topic)
        assert captures is not None
        return route.template.render(topic, captures)

    return {
        f"route a cached topic ({count} routes)": lambda: index.match(topic),
        f"route a new topic ({count} routes)": miss,
    }


def _per(case: Case, count: float) -> Case:
    """Mark a case whose one call does ``count`` operations (reported per operation)."""
    case.per = count  # type: ignore[attr-defined]
    return case


def mqtt5_cases() -> dict[str, Case]:
    """The same shapes through the `mqtt5` package, and what our API would pay on top."""
    from bench import codec_mqtt5

    return codec_mqtt5.cases(TOPIC, PAYLOAD, PACKET_ID, PROPS, MARKER)


def measure(cases: dict[str, Case], rounds: int, number: int) -> dict[str, float]:
    """Best µs per operation of each case over ``rounds`` interleaved rounds."""
    best = dict.fromkeys(cases, float("inf"))
    for case in cases.values():
        case()  # a wrong case fails here, not after minutes of timing
    clock = time.perf_counter
    for _ in range(rounds):
        for name, case in cases.items():
            per = getattr(case, "per", 1.0)
            calls = max(1, round(number / per))  # every case does ~``number`` operations
            loop = range(calls)
            began = clock()
            for _ in loop:
                case()
            elapsed = clock() - began
            best[name] = min(best[name], elapsed / (calls * per) * 1e6)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (best kept)")
    parser.add_argument("--number", type=int, default=5000, help="operations per case per round")
    parser.add_argument("--mqtt5", action="store_true", help="also time the mqtt5 package")
    parser.add_argument(
        "--against", metavar="FILE", help="also time this other version of mqtt_codec.py"
    )
    args = parser.parse_args(argv)
    cases = codec_cases()
    if args.against:
        cases |= codec_cases(load_codec(args.against), "against: ")
    cases |= routing_cases()
    if args.mqtt5:
        cases |= mqtt5_cases()
    results = measure(cases, args.rounds, args.number)
    compiled = not codec.__file__ or not codec.__file__.endswith(".py")
    print(f"codec: {codec.__file__} ({'compiled' if compiled else 'pure Python'})")
    print(f"routing: {RouteIndex.__module__} from {sys.modules[RouteIndex.__module__].__file__}")
    print(f"best of {args.rounds} rounds x {args.number} operations, µs per operation")
    width = max(map(len, results))
    for name, us in results.items():
        print(f"  {name:<{width}}  {us:7.3f}")


if __name__ == "__main__":
    main()
