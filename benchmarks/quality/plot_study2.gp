# Study 2 (init scale 0.1 against 1.0, E = 8): training loss of every seed.
# usage: gnuplot -e "dir='FIGURES'" plot_study2.gp
set terminal pngcairo size 900,560 font ",11"
set termoption noenhanced
set datafile missing "nan"
set grid
set xlabel "iteration"
set ylabel "training lm_loss (nats/byte)"
set output dir."/study2_init_scale.png"
set title "Switch E = 8, init scale 0.1 (blue) against 1.0 (red): training loss, one line per seed"
small = dir."/study2_train_init0.1.dat"
large = dir."/study2_train_init1.0.dat"
stats small skip 1 nooutput
nsmall = STATS_columns
stats large skip 1 nooutput
nlarge = STATS_columns
set yrange [*:4]
plot for [i=2:nsmall] small using 1:i with lines lw 1 lc rgb "#1f5fbf" title (i == 2 ? "scale 0.1" : ""), \
     for [i=2:nlarge] large using 1:i with lines lw 1 lc rgb "#d62728" title (i == 2 ? "scale 1.0" : "")
