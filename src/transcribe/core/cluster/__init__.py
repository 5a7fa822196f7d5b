"""`serve --mode ray`: the task directory served by Ray actors across a cluster.

placement.py (pure: how many actors where, with which resources and device), actor.py (one engine
per Ray actor), driver.py (the loop that owns the task directory and commits every result).
Ray is imported only inside actor.py/driver.py functions: `pip install transcribe[ray]`.
"""
