"""The machinery the PMAT scripts share (CleanRL keeps its extras in cleanrl_utils/ the same way): run folders, seeds
and flag checks (runs), torchrun (distributed), checkpoints and --resume (checkpoints), torch.compile (compile),
videos and --eval-only (video), the StarCraft II process-per-game env (sc2). A script imports a module inside the
function that uses it; nothing here imports a script: what a function needs is passed in."""
