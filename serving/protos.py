"""Messages this package declares at run time (no generated _pb2 module, no protoc at build time)."""
from __future__ import annotations

import threading
from typing import Dict, Optional, Sequence, Tuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "mmoe.serving"
_LOCK = threading.Lock()
_CLASSES: Dict[str, type] = {}
Field = descriptor_pb2.FieldDescriptorProto
# (name, number, label, type, type_name or None), with label and type from FieldDescriptorProto.
FieldSpec = Tuple[str, int, int, int, Optional[str]]


def declare_message(file_name: str, message_name: str, fields: Sequence[FieldSpec],
                    dependencies: Sequence[str] = ()) -> type:
    """The class of `mmoe.serving.<message_name>`, added to the default descriptor pool on the first call.

    Later calls (from any thread) return the same class.
    """
    pool = descriptor_pool.Default()
    full_name = f"{PACKAGE}.{message_name}"
    with _LOCK:
        if full_name in _CLASSES:
            return _CLASSES[full_name]
        # protobuf 3.20 (pinned by TensorFlow 2.16) has MessageFactory.GetPrototype, not GetMessageClass; a
        # fresh factory makes a fresh class, hence the cache.
        factory = message_factory.MessageFactory(pool)
        try:
            _CLASSES[full_name] = factory.GetPrototype(pool.FindMessageTypeByName(full_name))
            return _CLASSES[full_name]
        except KeyError:
            pass
        file_proto = descriptor_pb2.FileDescriptorProto(name=file_name, package=PACKAGE,
                                                        dependency=list(dependencies), syntax="proto3")
        message = file_proto.message_type.add(name=message_name)
        for name, number, label, type_, type_name in fields:
            field = message.field.add(name=name, number=number, label=label, type=type_)
            if type_name:
                field.type_name = type_name
        pool.Add(file_proto)
        _CLASSES[full_name] = factory.GetPrototype(pool.FindMessageTypeByName(full_name))
        return _CLASSES[full_name]
