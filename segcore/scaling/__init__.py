"""Beyond the machine: communication benchmark, calibrated scaling model, memory model.

``comm``    collective time against message size (gloo / NCCL), DDP's bucket layout, and
            an alpha-beta fit per collective (ring algorithm).
``model``   step time, throughput and efficiency for 1 to 1,024 workers per engine, from a
            measured 1-worker step and an interconnect; leave-one-out error; report section.
``memory``  bytes per worker (parameters, gradients, optimizer state, activations) per
            engine, against measured peaks; the largest batch / model per GPU size.
"""
