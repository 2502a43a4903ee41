"""An agent that first burns one CPU for 2 s and touches 200 MB, then execs the
reference agent: the run the usage tests measure (local and Docker) and check for
≥ 1.5 CPU-s and a peak ≥ 200 MB (issue 26)."""

MIB = 1024 * 1024

# one CPU busy for 2 s, then 200 MB touched (resident, not just reserved), held in `block`
BURN = '''
end = time.process_time() + 2.0
while time.process_time() < end:  # one CPU, busy, for 2 s
    pass
block = bytearray(200 * 1024 * 1024)
for i in range(0, len(block), 4096):  # touched: resident, not just reserved
    block[i] = 1
'''

HEAVY = '''
import os, sys, time
''' + BURN + '''del block
os.execv(sys.executable, [sys.executable, "-m", "orchestrator.agent", *sys.argv[1:]])
'''
