// The hang watchdog (system.hang_timeout; docs/reliability.md, "Ranks that stall without
// failing"): a training rank that makes no progress for that long ends the job with one
// line, instead of waiting until the job's time limit. Progress is a beat: each step,
// phase, validation batch and block of checkpoint rows gives one. What it catches: a rank
// blocked in MPI or NCCL for a peer that stopped without dying (a frozen process, a hung
// file system on its node), and a rank stuck itself.
#pragma once

// Starts the watchdog thread (timeout_s <= 0: none). Counts as a beat.
void mp_watchdog_start(double timeout_s);
// Progress: `what` (a static string) names where, for the line should the next beat not come.
void mp_watchdog_beat(const char *what);
// Stops the thread (before MPI_Finalize, and before the process waits for anything that may
// legitimately take long outside its beats).
void mp_watchdog_stop(void);
