"""The pure scheduling core: queues, slots, limits, fairness, preemption, shedding, keys, a request's lifecycle.

Nothing here imports Ray, an HTTP library or asyncio, and every function that needs the time takes
`now`, so each policy is unit-tested in milliseconds with an injected clock (`tests/test_layers.py`
checks the imports).
"""
