"""What a broker can do to one connection that a real Mosquitto will not do on demand:
re-send a PUBLISH on the same connection, explain itself in reason strings, accept and
kick at once. Fake peers (tests/test_codec.py's FakeBroker, test_links' fake connection)."""

from __future__ import annotations

import asyncio

from bridge import mqtt_codec as codec
from bridge.errors import ConnectRefused
from bridge.mqtt import Endpoint, MqttConnection
from tests.test_codec import OPTIONS, FakeBroker, Recorder, fake_server
from tests.test_links import Factory, FakeConnection, Outcomes, running, target_link

V311 = OPTIONS.__class__(client_id="t", protocol=codec.PROTOCOL_311, clean_start=True, keepalive=0)


async def test_a_dup_resend_of_a_pending_packet_id_is_not_taken_twice() -> None:
    # A 3.1.1 broker that re-sends on the same connection: 2,000 messages had become
    # 4,098 deliveries. The re-send (DUP=1) of a packet id we hold is the same message.
    first = codec.encode_publish(b"a/1", b"one", 1, False, 7, codec.PROTOCOL_311)
    again = codec.encode_publish(b"a/1", b"one", 1, False, 7, codec.PROTOCOL_311, dup=True)
    other = codec.encode_publish(b"a/2", b"two", 1, False, 8, codec.PROTOCOL_311, dup=True)
    recorder = Recorder()
    async with FakeBroker([first, again, other]) as port:
        conn = MqttConnection(V311, recorder)
        await conn.connect(Endpoint("127.0.0.1", port))
        for _ in range(100):
            if len(recorder.messages) >= 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        # A DUP=1 for an id we do not hold (lost connection, first copy never arrived)
        # is a real message: it is taken.
        assert [m.payload for m in recorder.messages] == [b"one", b"two"]
        assert conn.duplicates_ignored == 1
        conn.puback(7)  # once acknowledged, the id may carry a new message
        await conn.disconnect()


async def test_connack_and_disconnect_reason_strings_reach_the_error() -> None:
    props = codec.encode_properties(
        {codec.REASON_STRING: "client id banned", codec.SERVER_REFERENCE: "other:1883"}
    )
    body = b"\x00\x8a" + props
    connack = bytes((0x20,)) + codec.encode_varint(len(body)) + body

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(connack)
        await writer.drain()
        await reader.read(1024)

    async with fake_server(refuse) as port:
        conn = MqttConnection(OPTIONS, Recorder())
        try:
            await conn.connect(Endpoint("127.0.0.1", port))
        except ConnectRefused as exc:
            text = str(exc)
        else:
            raise AssertionError("connect must be refused")
    assert "banned (0x8a)" in text
    assert "server says: client id banned" in text
    assert "server reference: other:1883" in text

    dprops = codec.encode_properties({codec.REASON_STRING: "maintenance window"})
    dbody = b"\x8b" + dprops
    disconnect = bytes((0xE0,)) + codec.encode_varint(len(dbody)) + dbody
    recorder = Recorder()
    async with FakeBroker([disconnect], close_after=True) as port:
        conn = MqttConnection(OPTIONS, recorder)
        await conn.connect(Endpoint("127.0.0.1", port))
        error = await asyncio.wait_for(recorder.lost, 5)
    assert "server shutting down (0x8b)" in str(error)
    assert "server says: maintenance window" in str(error)


async def test_a_puback_reason_string_is_in_the_dead_letter_reason() -> None:
    factory, outcomes = Factory(), Outcomes()
    link = target_link(factory, outcomes)
    async with running(link):
        conn = await factory.connected(1)
        from tests.test_links import envelope

        link.submit(envelope(1))
        conn.ack_reason = "server says: topic not in policy"
        link.on_puback(conn, 1, 0x87)
    ((_, outcome),) = outcomes.seen
    reason, label = outcome.dead_letter_reason(3)
    assert label == "rejected_0x87"
    assert reason == "rejected: not authorized (0x87); server says: topic not in policy"


class KickingFactory(Factory):
    """A broker that accepts every CONNECT and closes the connection at once."""

    def __call__(self, options, listener):  # type: ignore[no-untyped-def]
        conn = super().__call__(options, listener)
        original = conn.connect

        async def connect(endpoint: Endpoint, timeout: float = 10.0) -> None:
            await original(endpoint, timeout)
            asyncio.get_running_loop().call_soon(conn.drop)

        conn.connect = connect  # type: ignore[method-assign]
        return conn


async def test_a_broker_that_accepts_and_kicks_at_once_causes_no_reconnect_storm() -> None:
    # Before: the backoff reset after every successful CONNACK, so the link reconnected
    # every 0.1-0.2 s forever (14 reconnects in 1.9 s). Now a connection must stay up
    # for link.STABLE_AFTER before the backoff resets: the delays keep growing.
    factory, outcomes = KickingFactory(), Outcomes()
    link = target_link(factory, outcomes)
    async with running(link):
        await asyncio.sleep(3.0)
    # Growing jittered delays 0.1-0.2, 0.2-0.4, 0.4-0.8, 0.8-1.6, 1.6-3.2 s: at most 5
    # connections in 3 s (the storm made 15-30).
    assert len(factory.made) <= 6, len(factory.made)
    assert isinstance(factory.made[0], FakeConnection)
