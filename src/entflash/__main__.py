from entflash.cli import main

raise SystemExit(main())
