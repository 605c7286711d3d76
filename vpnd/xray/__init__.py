"""Building blocks for vpnd's ownership of the local Xray-core server.

* :mod:`vpnd.xray.links` — share links, subscription bodies and the validators config loading uses.
* :mod:`vpnd.xray.render` — the config file: template loading, streaming render, atomic write.
* :mod:`vpnd.xray.api` — the gRPC client for Xray's HandlerService and StatsService.
* :mod:`vpnd.xray.protowire` — the few protobuf wire-format primitives the client needs.

Nothing here touches the database; the xray writer task feeds these from it.
"""
