from mlx_dpo.cli import main

main()
