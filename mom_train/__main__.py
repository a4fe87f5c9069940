from mom_train.cli import main

raise SystemExit(main())
