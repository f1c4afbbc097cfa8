"""The DNS proxy: answers the names the mesh knows, forwards the rest.

``resolver`` is the sans-IO core (a query in, an answer or a forwarding
decision out); ``server`` is the per-pod asyncio shell (UDP and TCP on
port 15053 inside the pod's network namespace, where bpf/dns.c steers the
pod's port-53 queries).
"""
