//! The periodic recovery points: the agent's crash and app timers and the
//! CS's group-interval scheduler, with app-kind group points that freeze.
