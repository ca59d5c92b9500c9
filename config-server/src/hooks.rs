//! Plan hooks: only executables installed in the CS's hook directory run,
//! named by the plan; an RPC never carries a command line.
