# Study 5 (what experts learn): for each Switch layer of the first E = 8 model, the share of each
# kind of held-out byte that each expert receives. usage: gnuplot -e "dir='FIGURES'" plot_study5.gp
set terminal pngcairo size 900,520 font ",11"
set termoption noenhanced
load dir."/study5_axes.gp"
set xlabel "expert"
set xtics 1
set cblabel "share of the category's tokens"
set palette defined (0 "white", 0.5 "#6baed6", 1 "#08306b")
set cbrange [0:1]
set autoscale fix
do for [layer in layers] {
  set output dir."/study5_heatmap_layer".layer.".png"
  set title "Which expert takes which bytes: Switch layer ".layer." (rows sum to 1)"
  file = dir."/study5_heatmap_layer".layer.".dat"
  plot file using 1:2:3 with image notitle, \
       file using 1:2:(sprintf("%.2f", $3)) with labels font ",9" notitle
}
