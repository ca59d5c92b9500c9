//! Recovery plans by their effect: hooks run in order with their
//! environment, a failing pre-hook stops the job, `--point latest` gives
//! each machine its own point, and commit and reprotect work on a plan.
